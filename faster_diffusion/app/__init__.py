"""The product around the method: loading and downloading weights, one timed generation request, the command
line (``python -m faster_diffusion``) and the work behind the Cog predictor (``predict.py``)."""
