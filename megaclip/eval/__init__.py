"""megaclip.eval"""
