"""Training, data and evaluation for CARL encoders (``carlzoo.training``).

Installed with carlzoo; the runtime (``carlzoo``) never imports it.
"""
