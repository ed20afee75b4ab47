"""rko_ros: visuomotor diffusion policies on ROS 2, aligned to an operator's preferences.

Sub-packages, dependencies flowing one way (see DESIGN.md section 2):
  policy/     the diffusion policy, ONNX export and the torch-free runtime
  alignment/  preference losses, fine-tuning trainer, bandit theory checks, query sampler
  episodes/   rosbag2 recorder, SQLite catalog, training windows from bags
  sim/        the simulated cloth task
  ros/        the rclpy nodes (the only place rclpy is imported, with cli.py)
"""
__version__ = '0.1.0'
