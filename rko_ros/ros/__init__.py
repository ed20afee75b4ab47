"""rko_ros.ros"""
