// Work in progress (issue 2): kernels of this op family land here.
