"""ament_python build for rko_ros: `colcon build` on a robot, `pip install -e .` in the dev venv."""
from glob import glob
import os

from setuptools import find_packages, setup

package_name = 'rko_ros'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        (os.path.join('share', package_name, 'launch'), glob('launch/*.launch.py')),
        (os.path.join('share', package_name, 'config'), glob('config/*.yaml')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='rko_ros maintainers',
    maintainer_email='rko-ros@example.com',
    description='Preference-aligned visuomotor diffusion policies on ROS 2 (RKO, DPO, RPO, KTO, FKPD)',
    license='Apache-2.0',
    tests_require=['pytest'],
    entry_points={
        'console_scripts': [
            'rko = rko_ros.cli:main',
            'policy_node = rko_ros.ros.policy_node:main',
            'episode_node = rko_ros.ros.episode_node:main',
            'trainer_node = rko_ros.ros.trainer_node:main',
            'sim_node = rko_ros.ros.sim_node:main',
        ],
    },
)
