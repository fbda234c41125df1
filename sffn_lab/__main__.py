from sffn_lab.cli import main

main()
