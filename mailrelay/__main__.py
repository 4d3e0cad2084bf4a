"""`python -m mailrelay` runs the command line."""

from mailrelay.cli import main

main()
