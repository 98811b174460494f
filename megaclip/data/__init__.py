"""megaclip.data"""
