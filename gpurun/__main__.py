from gpurun.cli import entry

entry()
