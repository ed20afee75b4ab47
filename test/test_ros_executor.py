"""ServiceThreadsExecutor over real rclpy: a slow service does not hold up subscriptions, and what
a callback raises reaches the spinning thread."""
import threading
import time

import pytest
import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import SingleThreadedExecutor
from std_msgs.msg import Int32
from std_srvs.srv import Trigger

from rko_ros.ros.executor import ServiceThreadsExecutor


def _frames_during_slow_call(context, executor, ns):
    """Messages a subscription took (published at 50 Hz) while a 1 s service call ran."""
    server = rclpy.create_node('server', namespace=ns, context=context)
    received = []
    server.create_subscription(Int32, 'frames', lambda m: received.append(time.monotonic()), 10)

    def slow(request, response):
        time.sleep(1.0)
        response.success, response.message = True, 'loaded'
        return response

    server.create_service(Trigger, 'slow', slow, callback_group=MutuallyExclusiveCallbackGroup())
    talker = rclpy.create_node('talker', namespace=ns, context=context)
    pub = talker.create_publisher(Int32, 'frames', 10)
    talker.create_timer(0.02, lambda: pub.publish(Int32(data=1)))
    executor.add_node(server)
    executor.add_node(talker)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    caller = rclpy.create_node('caller', namespace=ns, context=context)
    caller_executor = SingleThreadedExecutor(context=context)
    caller_executor.add_node(caller)
    client = caller.create_client(Trigger, 'slow')
    assert client.wait_for_service(timeout_sec=10.0)
    end = time.monotonic() + 10.0
    while len(received) < 5 and time.monotonic() < end:
        time.sleep(0.02)
    start = time.monotonic()
    future = client.call_async(Trigger.Request())
    caller_executor.spin_until_future_complete(future, timeout_sec=10.0)
    stop = time.monotonic()
    assert future.result() is not None and future.result().message == 'loaded'
    executor.shutdown()
    spinner.join(5.0)
    for node in (server, talker, caller):
        node.destroy_node()
    return sum(start + 0.1 <= t <= stop - 0.1 for t in received), stop - start


def test_a_slow_service_does_not_hold_up_subscriptions(context):
    during, took = _frames_during_slow_call(context, ServiceThreadsExecutor(context=context), 'a')
    assert took >= 1.0
    # 0.8 s of the call at 50 Hz is 40 messages; a loaded CI runner still delivers most.
    assert during >= 20, during


def test_on_one_thread_the_same_service_would_stop_them(context):
    # What the pool is for: rclpy's SingleThreadedExecutor takes nothing while the service runs.
    during, _ = _frames_during_slow_call(context, SingleThreadedExecutor(context=context), 'b')
    assert during == 0


def test_what_a_callback_raises_reaches_the_spinning_thread(context):
    node = rclpy.create_node('raiser', namespace='c', context=context)

    def broken(request, response):
        raise ValueError('service bug')

    node.create_service(Trigger, 'broken', broken)
    executor = ServiceThreadsExecutor(context=context)
    executor.add_node(node)
    caller = rclpy.create_node('caller', namespace='c', context=context)
    client = caller.create_client(Trigger, 'broken')
    executor.add_node(caller)
    end = time.monotonic() + 10.0
    while not client.service_is_ready() and time.monotonic() < end:
        executor.spin_once(timeout_sec=0.05)
    client.call_async(Trigger.Request())
    with pytest.raises(ValueError, match='service bug'):
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)
    executor.shutdown()
    node.destroy_node()
    caller.destroy_node()


def test_service_threads_must_be_positive(context):
    with pytest.raises(ValueError, match='service_threads=0'):
        ServiceThreadsExecutor(0, context=context)
