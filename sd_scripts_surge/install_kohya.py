"""`python -m sd_scripts_surge.install_kohya PATH_TO_KOHYA_SS [--uninstall] [--dry-run]`; see gui/kohya_installer."""

from sd_scripts_surge.gui.kohya_installer import main

if __name__ == "__main__":
    raise SystemExit(main())
