"""`python -m sd_scripts_surge.gui`."""

from sd_scripts_surge.gui.app import main

main()
