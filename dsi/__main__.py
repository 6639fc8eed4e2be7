from dsi.tools.cli import main

main()
