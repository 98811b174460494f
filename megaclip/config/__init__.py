"""megaclip.config"""
