"""The measurement core shared by every suite: one module per concern.

timing (``benchmark``, ``time_mode``), memory (``peak_bytes_above_inputs``,
``saved_tensor_bytes``), flops (analytic counts, TFLOPS/GB/s), env (``environment``),
roofs (``roof_for``), records (the JSON-lines store), runner (``Suite``, ``Point``,
``SweepConfig``, ``run_suite``), measure (the standard metrics of one callable),
compare (the regression gate).
"""
