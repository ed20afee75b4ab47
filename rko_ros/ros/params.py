"""Parameter declaration and validation shared by the rko_ros nodes.

Each node lists its parameters once as `{name: Param(...)}`; `declare_all` declares them with
descriptors (description, range, read-only) and turns every bad value into a ConfigError that names
the node, the parameter, the value and the fix, so a node with a wrong config stops at start with
one clear line instead of misbehaving later. config/rko.yaml documents the same names.
"""
import dataclasses
import os
import sys
from typing import Any, Optional, Tuple

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import (InvalidParameterTypeException, InvalidParameterValueException,
                              ParameterUninitializedException)

from rko_ros.errors import ConfigError


@dataclasses.dataclass
class Param:
    default: Any                      # a value, or a Parameter.Type for "no default" (value None)
    description: str
    range: Optional[Tuple[float, float]] = None
    read_only: bool = True
    choices: Optional[Tuple[str, ...]] = None


def descriptor(param):
    d = ParameterDescriptor(description=param.description, read_only=param.read_only)
    if param.choices:
        d.additional_constraints = f'one of: {", ".join(param.choices)}'
    if param.range is not None:
        low, high = param.range
        if isinstance(param.default, bool):
            pass
        elif isinstance(param.default, int):
            d.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=1)]
        elif isinstance(param.default, float):
            d.floating_point_range = [FloatingPointRange(from_value=float(low),
                                                         to_value=float(high))]
    return d


def declare_all(node, spec):
    """Declare every parameter of `spec` on `node`; returns {name: value}."""
    values = {}
    for name, param in spec.items():
        try:
            value = node.declare_parameter(name, param.default, descriptor(param)).value
        except InvalidParameterTypeException as exc:
            raise ConfigError(f'{node.get_name()} parameter {name}: {exc}; give a value like '
                              f'{param.default!r}') from None
        except InvalidParameterValueException as exc:
            raise ConfigError(f'{node.get_name()} parameter {name}: {exc}; allowed range '
                              f'{param.range}, default {param.default!r}') from None
        except ParameterUninitializedException:
            value = None
        if isinstance(value, (list, tuple)) or type(value).__name__ == 'array':
            value = list(value)
        if param.choices and value not in param.choices:
            raise ConfigError(f'{node.get_name()} parameter {name}={value!r} is unknown; use one '
                              f'of {", ".join(param.choices)}')
        values[name] = value
    return values


def default_data_dir():
    # The same default as the `rko` commands, so a node and the CLI see the same data.
    return os.environ.get('RKO_DATA_DIR', 'data')


def flat_limits(node_name, values, n):
    """action_limits [lo0, hi0, lo1, hi1, ...] -> [(lo, hi)] * n, or None when empty."""
    if not values:
        return None
    if len(values) != 2 * n:
        raise ConfigError(f'{node_name} parameter action_limits has {len(values)} numbers; give '
                          f'{2 * n} (low, high for each of the {n} action dims) or leave it empty')
    pairs = [(float(values[2 * i]), float(values[2 * i + 1])) for i in range(n)]
    bad = [i for i, (lo, hi) in enumerate(pairs) if not lo < hi]
    if bad:
        raise ConfigError(f'{node_name} parameter action_limits: dim {bad[0]} has low '
                          f'{pairs[bad[0]][0]} >= high {pairs[bad[0]][1]}; give low < high')
    return pairs


def spin(executor):
    """`executor.spin()` until shutdown. A signal can shut the context down between rclpy's own
    shutdown check and the next wait set, which then fails with RCLError ('context is not
    valid'): with the context gone that is the shutdown, not a failure, and exits as one."""
    try:
        executor.spin()
    except RuntimeError:
        if executor.context.ok():
            raise


def run_node(node_factory, args=None, service_threads=2):
    """The shared `main`: init, build the node (ConfigError: one line, exit 2), spin, shut down."""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rko_ros.ros.executor import ServiceThreadsExecutor
    try:
        with rclpy.init(args=args):
            try:
                node = node_factory()
            except ConfigError as exc:
                print(f'error: {exc}', file=sys.stderr)
                return 2
            executor = ServiceThreadsExecutor(service_threads)
            executor.add_node(node)
            try:
                spin(executor)
            finally:
                close = getattr(node, 'close', None)
                if close:
                    close()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    return 0




def guarded_service(node, srv_type, name, handler, callback_group=None):
    """create_service whose handler cannot take the process down: an unexpected exception is
    logged and answered as success=false with its text (an executor re-raises it otherwise,
    stopping every node in the process, the control loop included)."""
    def callback(request, response):
        try:
            return handler(request, response)
        except Exception as exc:  # noqa: BLE001 - answered, logged, never silent
            node.get_logger().error(f'{name} failed: {type(exc).__name__}: {exc}')
            response.success = False
            response.message = f'{name} failed: {type(exc).__name__}: {exc}'
            return response
    return node.create_service(srv_type, name, callback, callback_group=callback_group)
