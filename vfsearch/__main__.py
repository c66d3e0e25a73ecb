from vfsearch.cli import main

main()
