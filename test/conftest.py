"""Test-wide set-up: every pytest process gets its own ROS domain, discovery stays on localhost."""
import os

import pytest

# Set before any test imports rclpy. Domain ids 1..100 keep clear of 0 (the default a robot uses).
os.environ.setdefault('ROS_DOMAIN_ID', str(1 + os.getpid() % 100))
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
os.environ.setdefault('RCUTILS_LOGGING_BUFFERED_STREAM', '1')


@pytest.fixture
def context():
    """A fresh rclpy context for in-process nodes, shut down after the test."""
    import rclpy
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    ctx.try_shutdown()
