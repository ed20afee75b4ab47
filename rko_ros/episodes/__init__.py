"""rko_ros.episodes"""
