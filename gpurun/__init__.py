"""gpurun: reserve GPUs and CPUs on a shared server, run a command pinned to them, free them."""

__version__ = "0.1.0"
