"""Quality harnesses (``python -m retro_compile.eval ppl ...``)."""
