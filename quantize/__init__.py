"""Offline DASH-Q: calibration capture, solvers (DASH-Q, RTN, GPTQ), checkpoint writer, eval.

Never imports vLLM: the offline tool runs without it."""
