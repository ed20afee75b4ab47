"""The end-to-end demo and the alignment comparison on the simulated cloth task.

Sits above every other sub-package (it uses sim/, policy/, alignment/, episodes/ and ros/), like
cli.py; nothing else imports it.
"""
