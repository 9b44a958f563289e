from gpurun.entry import main

main()
