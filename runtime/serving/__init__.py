"""Serving the runtime on Triton Inference Server (torch-free): ``repository`` writes the model
repository (``ppllava triton-repo``), ``triton_model`` is its python-backend ``model.py``,
``request`` checks what a client sends, ``server`` runs the binary (``ppllava serve``)."""
