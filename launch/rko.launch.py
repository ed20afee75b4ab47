"""Bring-up: policy_node, episode_node, trainer_node (and sim_node with use_sim:=true).

    ros2 launch rko_ros rko.launch.py data_dir:=/data/rko \
        [config:=...] [use_sim:=true] [namespace:=rko]

Parameters come from config/rko.yaml in the package's share directory unless `config` names
another file; `data_dir` overrides the file's value for every node. `rko up` starts the same nodes
in one process for machines without ros2 launch.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    default_config = os.path.join(get_package_share_directory('rko_ros'), 'config', 'rko.yaml')
    data_dir = LaunchConfiguration('data_dir')
    config = LaunchConfiguration('config')
    namespace = LaunchConfiguration('namespace')
    arguments = [
        DeclareLaunchArgument('data_dir', default_value=os.path.join(os.getcwd(), 'data'),
                              description='folder with models/, episodes/, catalog.sqlite'),
        DeclareLaunchArgument('config', default_value=default_config,
                              description='parameter YAML (ros__parameters per node)'),
        DeclareLaunchArgument('use_sim', default_value='false',
                              description='also start sim_node, the simulated cloth table'),
        DeclareLaunchArgument('namespace', default_value='rko',
                              description='namespace of every node, topic and service'),
    ]

    def node(executable, condition=None, with_data_dir=True):
        parameters = [config] + ([{'data_dir': data_dir}] if with_data_dir else [])
        return Node(package='rko_ros', executable=executable, name=executable,
                    namespace=namespace, parameters=parameters, output='screen',
                    emulate_tty=True, condition=condition)

    return LaunchDescription(arguments + [
        node('policy_node'),
        node('episode_node'),
        node('trainer_node'),
        node('sim_node', condition=IfCondition(LaunchConfiguration('use_sim')),
             with_data_dir=False),
    ])
