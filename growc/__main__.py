from growc.cli import main

main()
