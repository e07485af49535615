"""The product around the method: loading and downloading weights, one timed generation request, the command
line (``python -m faster_diffusion``) and the work behind the Cog predictor (``predict.py``).

Only :mod:`.serving`, the Cog layer, imports ``cog`` (install the ``cog`` extra:
``pip install faster-diffusion[cog]``); the library and the command line never do."""
