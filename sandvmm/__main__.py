from sandvmm.cli import main

main()
