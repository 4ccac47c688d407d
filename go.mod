module github.com/ism-backend/ism-backend

go 1.26
