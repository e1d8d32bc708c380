from imcli.quick import main

main()
