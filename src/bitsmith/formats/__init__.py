"""bitsmith.formats"""
