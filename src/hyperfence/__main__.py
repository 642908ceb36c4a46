from hyperfence.cli.main import main

main()
