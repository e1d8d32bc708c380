from imcli.cli import main

main()
