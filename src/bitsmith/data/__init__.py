"""bitsmith.data"""
