"""The files between stages, owned by no stage: the pruned checkpoint's manifest (``checkpoint``), the exported
folder's ``export.json`` (``export_info``) and the packed sparse layout of weights inside model.onnx (``packed``).
Every stage imports these modules; they import nothing of the stages."""
