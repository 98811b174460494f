"""megaclip.train"""
