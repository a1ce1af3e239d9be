"""Forensic extraction from a running guest or a dump: files and cryptographic keys.

* :mod:`.files`: a file's contents from the kernel's own objects (inode, page cache), page cache
  over disk (:mod:`.disk`), with a map of where each range came from (:mod:`.ranges`);
  :mod:`.targets` names what to extract (a path, a descriptor, an executable, every mapped file).
* :mod:`.aes`: AES key schedules in a process's memory or all RAM, tolerant of flipped bits.
"""
