from simcc.cli import main

main()
