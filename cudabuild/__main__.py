from cudabuild.cli import main

main()
