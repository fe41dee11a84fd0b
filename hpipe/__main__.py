from hpipe.cli import main

main()
