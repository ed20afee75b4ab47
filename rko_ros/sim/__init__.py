"""rko_ros.sim"""
