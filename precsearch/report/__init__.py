"""What a finished study is turned into: CSV, plots and the HTML report, and exported libraries."""
