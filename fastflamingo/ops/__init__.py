"""The boundary between the public functional API and the kernels: custom ops and their launchers."""
