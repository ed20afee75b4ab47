"""rko_ros.policy"""
