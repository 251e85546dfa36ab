"""Knowledge: code-page database from Debian packages and ELF files, vulnerabilities, rules."""
