from carlzoo.cli.main import main

main()
