from imcli.cli.main import main

main()
