"""rko_ros.alignment"""
