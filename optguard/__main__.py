from optguard.cli import main

main()
