from ffasynth.cli import main

main()
