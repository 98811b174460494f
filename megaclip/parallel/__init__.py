"""megaclip.parallel"""
