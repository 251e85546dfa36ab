"""Response: what nephoscope does about a finding — host-side filters and notices to the VM's owner."""
