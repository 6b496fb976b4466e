"""Triton kernels. They take pointer tables, sizes and options and fill output buffers;
they know nothing of parameters, names or modules. Importing this package imports triton,
so the rest of gradstats imports it lazily, only once a tensor is routed here."""
